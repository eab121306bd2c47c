"""How a training step runs: eagerly, through torch.compile, or replayed as a CUDA graph.

The single-model trainer (:class:`trainables.runner.EpochRunner`) and the fused one
(:class:`trainables.fused_model.FusedModels`) each write their eager step (forward, loss,
backward, SGD update); :class:`CompiledStep` runs it as the ``compile`` knob says
(trainables/config.py):

* "off": the eager step;
* "torch": the forward and loss through ``torch.compile`` (inductor), the backward and the SGD
  update eager; a failed compilation falls back to eager steps (a warning, or an error when the mode
  was asked for by name);
* "cudagraph": after :data:`GRAPH_WARMUP_STEPS` eager steps on a side stream (PyTorch's recipe: the
  momentum buffers, cuDNN's algorithm choice and the allocator settle), the whole step is captured
  once as a CUDA graph and replayed for every full batch. The batch is copied into the graph's static
  input; whatever changes between steps must live in device tensors updated in place (the learning
  rate: refilled every epoch), never in Python values, which the capture bakes in;
* "cudagraph+torch": the torch.compile'd step captured the same way.

The last, smaller batch of an epoch always runs eagerly, so every mode trains on the same batches.
Written here rather than taken from ``torch.compile(mode="reduce-overhead")`` because the capture
has to include the optimizer's update and the learning rate read from device tensors, and a failed
capture must fall back to eager steps mid-run (the measured speedups: docs/performance.md).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch

from trainables.errors import WbsweepError

#: compile modes that capture the step as a CUDA graph: of the eager step, or of the torch.compile'd one
#: (inductor's fused kernels replayed from the graph, no Python per step).
GRAPH_MODES = ("cudagraph", "cudagraph+torch")

#: Eager steps of a CUDA-graph run before the step is captured (PyTorch's recipe: warm up on a side
#: stream, so the momentum buffers, cuDNN's algorithm choice and the allocator are settled).
GRAPH_WARMUP_STEPS = 3


class CompiledStep:
    """The step dispatch shared by the trainers. A subclass calls :meth:`init_step` in its
    ``__init__`` and defines

    * ``_forward_loss(x, y) -> (loss, out)``: the forward pass and the loss (what torch.compile
      compiles);
    * ``_eager_step(x, y, forward) -> Tensor``: one whole step with ``forward`` in place of
      ``_forward_loss`` (forward, backward, update), returning the step's output (a tensor the
      capture keeps as the graph's static output);
    * ``_clear_grads()``: drop the gradients (before a capture, and after a failed one).

    :meth:`step` then runs a batch (x, y) as :attr:`mode` says and returns the step's output."""

    knobs: Any  # trainables.runner.Knobs (compile, strict)
    device: torch.device
    bs: int

    def init_step(self, knobs: Any, device: torch.device, batch_size: int) -> None:
        self.knobs, self.device, self.bs = knobs, device, int(batch_size)
        self.mode: str = knobs.compile
        self._compiled: Callable | None = None
        self._compiled_ran = False
        if self.mode in ("torch", "cudagraph+torch"):
            if device.type == "cpu":
                import torch._inductor.config as inductor_config

                # compile with this trial's threads, not a worker per core of the machine
                inductor_config.compile_threads = max(1, torch.get_num_threads())
            self._compiled = torch.compile(self._forward_loss, dynamic=False)
        self.graph: torch.cuda.CUDAGraph | None = None
        self._warm = 0
        self._static: dict[str, torch.Tensor] = {}

    def _forward_loss(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _eager_step(self, x: torch.Tensor, y: torch.Tensor, forward: Callable) -> torch.Tensor:
        raise NotImplementedError

    def _clear_grads(self) -> None:
        raise NotImplementedError

    def step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One SGD step on the batch (x, y); returns the step's output (see the subclass)."""
        full = y.shape[-1] == self.bs
        if full and self.mode in GRAPH_MODES:
            return self._graph_step(x, y)
        if full and self._compiled is not None and self.mode == "torch":
            if self._compiled_ran:
                return self._eager_step(x, y, self._compiled)
            try:  # the first call compiles (a C++ compiler is needed on a CPU)
                out = self._eager_step(x, y, self._compiled)
            except Exception as exc:  # any compilation failure: eager steps, or a clear error
                self._compiled = None
                self._fall_back_to_eager("torch.compile of the training step", exc)
                return self._eager_step(x, y, self._forward_loss)
            self._compiled_ran = True
            return out
        return self._eager_step(x, y, self._forward_loss)

    def _graph_step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if not self._static:
            self._static = {"x": torch.empty_like(x), "y": torch.empty_like(y)}
        sx, sy = self._static["x"], self._static["y"]
        sx.copy_(x)
        sy.copy_(y)
        forward = self._compiled if self.mode == "cudagraph+torch" and self._compiled else self._forward_loss
        if self.graph is None:
            if self._warm < GRAPH_WARMUP_STEPS:
                self._warm += 1
                side, main = torch.cuda.Stream(self.device), torch.cuda.current_stream(self.device)
                side.wait_stream(main)
                try:
                    with torch.cuda.stream(side):  # the first warm-up step compiles (compile=cudagraph+torch)
                        out = self._eager_step(sx, sy, forward)
                except Exception as exc:
                    if forward is self._forward_loss:
                        raise
                    main.wait_stream(side)
                    self._compiled = None
                    self._fall_back_to_eager("torch.compile of the training step", exc)
                    return self._eager_step(sx, sy, self._forward_loss)
                main.wait_stream(side)
                return out
            try:
                self._capture(forward)
            except Exception as exc:  # any capture failure: eager steps, or a clear error
                self._abandon_graph(exc)
                return self._eager_step(sx, sy, self._forward_loss)
        self.graph.replay()
        return self._static["out"]

    def _capture(self, forward: Callable) -> None:
        """Record one whole step. Nothing runs while recording: the replay that follows performs the
        step. What changes between steps is read from device tensors, never baked in."""
        self._clear_grads()  # the graph's backward allocates the gradients in its pool
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self._eager_step(self._static["x"], self._static["y"], forward)
        self._static["out"] = out
        self.graph = graph

    def _abandon_graph(self, exc: Exception) -> None:
        self.graph = None
        self._fall_back_to_eager("capturing the training step as a CUDA graph", exc)

    def _fall_back_to_eager(self, what: str, exc: Exception) -> None:
        """After a failed compile or capture: eager steps from now on, with a warning under
        compile=auto, or a clear error when that mode was asked for by name."""
        self.mode = "off"
        self._clear_grads()
        msg = f"{what} failed ({type(exc).__name__}: {str(exc)[:300]})"
        if self.knobs.strict:
            raise WbsweepError(f"{msg}; use compile=off (or auto).") from exc
        warnings.warn(f"{msg}; training continues with eager steps.", RuntimeWarning, stacklevel=4)
