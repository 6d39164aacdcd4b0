"""Paper-scale estimates: what a method costs on a 3B-175B model, from its config alone.

``python -m peftbench.estimate model=gpt3-175b method=lora rank=4`` builds the model on the
meta device (shapes only: no weight memory, no download), applies the REAL method code
(``methods.build(cfg.method).apply``), and derives, per training step of ``batch_size`` x
``seq_length`` tokens:

- trainable / total parameters, counted on the modified meta model (tied tensors once);
- checkpoint bytes: what the method trains, in its training dtype (full: the whole model);
- weight, gradient and optimizer-state bytes under ``precision`` (see ``PRECISIONS``);
- activation bytes: every tensor autograd saves for the backward pass, counted on the meta
  device by running the model's own forward (``trace``), with attention as a fused (flash)
  kernel saves it; an ESTIMATE (see ``docs/ESTIMATES.md`` for its assumptions and its measured
  error), plus the Korthikanti et al. (2022) closed form for comparison;
- training FLOPs per token and per step: every matrix product of the forward and backward
  pass, counted on the meta device (``torch.utils.flop_counter``), so frozen weights cost no
  weight gradient and layers below the first trainable parameter no input gradient; attention
  score/value products added in closed form.

Modules: ``cost`` (the cost model), ``app`` (config, record, table: the command's glue),
``calibrate`` (estimates beside tracked real steps). Records have the measured-run format
(``kind: "estimate"``) and go to ``results_dir``.
``python -m peftbench.estimate calibrate`` puts each estimated part beside the tensor-memory
tracker's measurement of a real fp32 training step on the small built-in models.
"""
