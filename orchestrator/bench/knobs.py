"""Do the speed knobs keep the numbers? (``wbsweep bench --check-knobs``)

:func:`check_knobs` trains from the same init on the same batches with each speed knob
(channels_last, bf16, CUDA graph, torch.compile) against eager fp32 and compares gradients, weights
and losses; on CUDA, :func:`count_host_syncs` counts the host synchronisations inside an epoch of
the CUDA-graph trainer.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch

from orchestrator.bench.setup import Log, _setup, _sync, bench_config, data_kind, device_name, synthetic_dataset
from trainables.data import LTDataset
from trainables.device_data import DeviceData
from trainables.models import ModelSpec, build_model
from trainables.train import build_training

# --- do the knobs keep the numbers? ----------------------------------------------------------------


def _train_variant(data: LTDataset, dev: torch.device, model: str, batch_size: int, epochs: int,
                   knob_cfg: dict[str, Any], width: int | None, perturb: float = 0.0,
                   ) -> tuple[torch.Tensor, list[float]]:
    """Train ``epochs`` epochs from the seed-0 initialisation (its weights times 1 +- ``perturb``
    when asked) on the seed-0 batches; return the flat weights and each epoch's mean loss."""
    cfg = bench_config(model, dev.type, batch_size, width, {"epochs": max(epochs, 2), **knob_cfg})
    torch.manual_seed(0)
    run = build_training(cfg, DeviceData(data, dev))
    if perturb:
        gen = torch.Generator().manual_seed(123)
        with torch.no_grad():
            for p in run.model.parameters():
                sign = torch.randint(0, 2, p.shape, generator=gen).to(p.device, p.dtype) * 2 - 1
                p.mul_(1 + perturb * sign)
    runner = run.runner()
    losses = []
    for _ in range(epochs):
        loss_sum, seen = runner.epoch()
        run.sched.step()
        losses.append(float(loss_sum) / seen)
    return _flat({k: p.detach() for k, p in run.model.named_parameters()}), losses


def _flat(weights: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([w.detach().double().cpu().reshape(-1) for w in weights.values()])


def _grads(data: LTDataset, dev: torch.device, model: str, batch_size: int, width: int | None,
           knob_cfg: dict[str, Any], float64: bool = False) -> tuple[torch.Tensor, float]:
    """Gradient (flat, float64 on the CPU) and loss of the first training batch at the seed-0
    initialisation, computed as the trainer computes it with these knobs; ``float64``: the same in
    float64 throughout (the reference)."""
    import copy

    cfg = bench_config(model, dev.type, batch_size, width, {"epochs": 2, **knob_cfg})
    torch.manual_seed(0)
    dd = DeviceData(data, dev)
    run = build_training(cfg, dd)
    runner = run.runner()
    x_u8, y = dd.x["train"][:batch_size], dd.y["train"][:batch_size]
    x = dd.prepare(x_u8, False, None, runner.channels_last)
    net = run.model
    if float64:
        net = copy.deepcopy(net).double()
        net.train()
        feats = net.backbone(x.double())
        logits = net.classifier(feats)
        loss = run.loss_fn(feats, logits, y, net)
    else:
        net.train()
        loss, _ = (runner._compiled or runner._forward_loss)(x, y)
    loss.backward()
    return torch.cat([p.grad.detach().double().cpu().reshape(-1) for p in net.parameters()]), float(loss.detach())


def _label(knob_cfg: dict[str, Any]) -> str:
    parts = [knob_cfg.get("precision", "fp32")]
    if knob_cfg.get("channels_last"):
        parts.append("channels_last")
    if knob_cfg.get("compile", "off") != "off":
        parts.append(f"compile={knob_cfg['compile']}")
    return " + ".join(parts)


def check_knobs(device: str = "cpu", model: str = "resnet32", batch_size: int = 64, steps: int = 5,
                epochs: int = 2, width: int | None = None, with_torch_compile: bool = False,
                log: Log = print) -> dict[str, Any]:
    """Do the speed knobs keep the numbers? TF32 off and cuDNN deterministic during the check, so
    fp32 means fp32. Data: ``steps`` full batches and a partial one per epoch.

    A. Gradient of one batch at the initialisation, against the same computation in float64:
       fp32 knob settings (channels_last, torch.compile) must be about as accurate as plain fp32
       (error at most 10 x eager fp32's, or 1e-2: the level of the TF32 convolutions that PyTorch
       uses for fp32 on NVIDIA GPUs by default; a deep net at initialisation is ill-conditioned,
       and PyTorch's channels-last BatchNorm on CPUs rounds more than its NCHW one); bf16 must point
       the same way (cosine > 0.95).
    B. (CUDA) The CUDA-graph trainer against the eager one with the same knobs, ``epochs`` epochs on
       the same batches (warm-up steps, capture, replays, the eager partial batch, the learning rate
       of the next epoch): weights at most as far apart as a one-ulp change of the initial weights
       moves eager training (bit-identical is expected).
    C. Mean training loss of the last epoch with each setting against eager fp32: within 2e-3
       (fp32 settings) or 2e-2 (bf16).
    D. (CUDA) Host synchronisations inside one epoch of the default trainer: 0 expected."""
    dev = _setup(device, None)
    data = synthetic_dataset(data_kind(model), steps * batch_size + 17, seed=1)
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32,
             torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    cuda = dev.type == "cuda"
    base = {"channels_last": False, "precision": "fp32", "compile": "off"}
    settings = [{**base, "channels_last": True}, {**base, "precision": "bf16"},
                {**base, "precision": "bf16", "channels_last": True}]
    if with_torch_compile:
        settings.append({**base, "compile": "torch"})
    result: dict[str, Any] = {"gradient": [], "cuda_graph": [], "loss": []}
    oks: list[bool] = []

    def attempt(rows: list, label: str, fn: Callable[[], dict[str, Any]]) -> None:
        try:
            row = {"knobs": label, **fn()}
        except Exception as exc:  # one broken path must not hide the others
            row = {"knobs": label, "ok": False, "error": f"{type(exc).__name__}: {exc}"}
            log(f"    {label:<34} FAILED: {row['error'][:300]}")
        rows.append(row)
        oks.append(row["ok"])

    try:
        log(f"knob check {model} on {device_name(dev)} (TF32 off, deterministic cuDNN; {epochs} epochs of "
            f"{steps} batches of {batch_size} + 1 of 17):")
        g64, _ = _grads(data, dev, model, batch_size, width, base, float64=True)
        g32, _ = _grads(data, dev, model, batch_size, width, base)
        e32 = float((g32 - g64).norm() / g64.norm())
        log(f"  A. gradient of one batch vs float64 (eager fp32: relative error {e32:.1e})")
        result["fp32_gradient_error"] = e32

        def grad_row(knob: dict[str, Any]) -> dict[str, Any]:
            g, _ = _grads(data, dev, model, batch_size, width, knob)
            err = float((g - g64).norm() / g64.norm())
            cos = float(g @ g64 / (g.norm() * g64.norm()))
            ok = cos > 0.95 if knob["precision"] == "bf16" else err <= max(10 * e32, 1e-2)
            rule = "cosine > 0.95" if knob["precision"] == "bf16" else "error <= max(10x fp32's, 1e-2)"
            log(f"    {_label(knob):<34} error {err:.1e}  cosine {cos:.6f}  {'PASS' if ok else 'FAIL'} ({rule})")
            return {"error": err, "cosine": cos, "ok": ok}

        for knob in settings:
            attempt(result["gradient"], _label(knob), lambda knob=knob: grad_row(knob))

        init = _flat({k: p for k, p in _init_weights(data, dev, model, width).items()})
        ref_w, ref_loss = _train_variant(data, dev, model, batch_size, epochs, base, width)
        if cuda:
            lr = {"lr": 1e-3}  # a gentler step keeps the one-ulp yardstick small
            ulp_w, _ = _train_variant(data, dev, model, batch_size, epochs, {**base, **lr}, width, perturb=2**-23)
            eager_w, _ = _train_variant(data, dev, model, batch_size, epochs, {**base, **lr}, width)
            floor = float((ulp_w - eager_w).norm() / (eager_w - init).norm())
            log(f"  B. CUDA graph vs eager, same knobs and batches (a 1-ulp change of the initial weights moves "
                f"the weights by {floor:.1e})")
            result["ulp_yardstick"] = floor

            def graph_row(knob: dict[str, Any]) -> dict[str, Any]:
                w_e, l_e = _train_variant(data, dev, model, batch_size, epochs, {**knob, **lr}, width)
                w_g, l_g = _train_variant(data, dev, model, batch_size, epochs,
                                          {**knob, **lr, "compile": "cudagraph"}, width)
                diff = float((w_g - w_e).norm() / (w_e - init).norm())
                ok = diff <= max(floor, 1e-9)
                same = "bit-identical" if diff == 0 else f"{diff:.1e}"
                log(f"    {_label(knob):<34} {same:<14} losses {l_g[-1]:.6f} / {l_e[-1]:.6f}  "
                    f"{'PASS' if ok else 'FAIL'}")
                return {"weight_diff": diff, "loss_graph": l_g[-1], "loss_eager": l_e[-1], "ok": ok}

            for knob in (base, {**base, "channels_last": True}, {**base, "precision": "bf16", "channels_last": True}):
                attempt(result["cuda_graph"], _label(knob), lambda knob=knob: graph_row(knob))
        log(f"  C. mean training loss of epoch {epochs} vs eager fp32 ({ref_loss[-1]:.6f})")

        def loss_row(knob: dict[str, Any]) -> dict[str, Any]:
            _, loss = _train_variant(data, dev, model, batch_size, epochs, knob, width)
            d = abs(loss[-1] - ref_loss[-1]) / abs(ref_loss[-1])
            tol = 2e-2 if knob["precision"] == "bf16" else 2e-3
            ok = d < tol
            log(f"    {_label(knob):<34} {loss[-1]:.6f}  relative difference {d:.1e}  {'PASS' if ok else 'FAIL'}")
            return {"loss": loss[-1], "relative_diff": d, "ok": ok}

        loss_settings = list(settings)
        if cuda:
            loss_settings.append({**base, "precision": "bf16", "channels_last": True, "compile": "cudagraph"})
        for knob in loss_settings:
            attempt(result["loss"], _label(knob), lambda knob=knob: loss_row(knob))
    finally:
        (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32,
         torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark) = saved
    if cuda:
        result["host_syncs_in_epoch"] = count_host_syncs(data, dev, model, batch_size, width, log)
        oks.append(result["host_syncs_in_epoch"] == 0)
    result["ok"] = all(oks)
    log(f"  knob check: {'PASS' if result['ok'] else 'FAIL'}")
    return result


def _init_weights(data: LTDataset, dev: torch.device, model: str, width: int | None) -> dict[str, torch.Tensor]:
    cfg = bench_config(model, dev.type, 64, width)
    torch.manual_seed(0)
    spec = ModelSpec(model, data.num_classes, data.x_train.shape[1], data.x_val.shape[-1], cfg["classifier"],
                     cfg["etf_bias"], width, etf_seed=cfg["seed"])
    return {k: p.detach() for k, p in build_model(spec).named_parameters()}


def is_sync_warning(message: str) -> bool:
    """Whether a warning of torch's sync-debug mode reports a synchronising call ("called a
    synchronizing CUDA operation"), not the one saying the mode is a prototype, which this
    project's first GPU figures counted as a synchronisation by mistake."""
    return "synchronizing cuda operation" in message.lower()


def count_host_syncs(data: LTDataset, dev: torch.device, model: str, batch_size: int, width: int | None,
                     log: Log = print) -> int:
    """Synchronising CUDA calls during one epoch of the default (CUDA-graph) trainer after its
    warm-up, as torch.cuda.set_sync_debug_mode reports them."""
    cfg = bench_config(model, dev.type, batch_size, width)
    torch.manual_seed(0)
    run = build_training(cfg, DeviceData(data, dev))
    knobs = run.knobs
    runner = run.runner()
    runner.epoch()
    run.sched.step()
    _sync(dev)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            loss_sum, _ = runner.epoch()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    float(loss_sum)
    syncs = [str(w.message).splitlines()[0] for w in caught if is_sync_warning(str(w.message))]
    log(f"  D. host synchronisations inside one epoch (compile={knobs.compile}): {len(syncs)}"
        + (f" - first: {syncs[0][:120]}" if syncs else ""))
    return len(syncs)
