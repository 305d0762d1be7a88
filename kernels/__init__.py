"""Fused Llama kernels for AWS Trainium (NKI), their PyTorch references and torch custom ops.

kernels.ops        the public ops (rms_norm, apply_rope, swiglu, flash_attention) and backend selection
kernels.reference  pure-PyTorch references (also the ``reference`` backend)
kernels/<op>.py    the NKI kernels with torch-level launchers; kernels.sim the CPU interpreter of NKI
Nothing is imported here, so that ``kernels.sim`` stays importable without torch.
"""
