"""Triton kernels of rho-fused, installed as `rho_fused.kernels`.

One kernel per file beside its launcher (module: launcher). This package knows only Triton and
torch tensors.

- `compact`: `compact_mask`, the set positions of a mask as an index list, count on the device
- `forward`: `logsumexp_partials`, LM-head matmul + online logsumexp + target logit (and, for
  label smoothing, the sum of the logits) per vocabulary slice
- `merge`: `merge_partials`, the slices' partials into ``lse``, ``ce``, ``excess``
- `select`: `radix_top_k`, exact top-k per selection group by radix select, ties to the lower index
  (of the excess, or of the sampling keys)
- `backward`: `kept_rows_backward`, kept rows only, one logits recompute into a `dz` chunk, then
  cuBLAS matmuls for d hidden / d weight / d bias (no atomics); per-row weights, z-loss, label
  smoothing and a gradient of ``lse`` enter ``dz``
- `plan`: the launch arithmetic, pure Python: the forward's vocabulary splits, the backward's chunks
- `tile`: the logits tile both matmul kernels compute (device helpers, no kernel)
- `report`: ``python -m rho_fused.kernels.report``, the offline compile report for sm_80 / sm_90
"""
