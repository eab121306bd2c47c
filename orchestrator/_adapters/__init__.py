"""(placeholder; replaced by the adapters branch)"""
