"""Paper-scale estimates: what a method costs on a 3B-175B model, from its config alone.

``python -m peftbench.estimate model=gpt3-175b method=lora rank=4`` builds the model on the
meta device (shapes only: no weight memory, no download), applies the REAL method code
(``methods.build(cfg.method).apply``), and derives, per training step of ``grad_accum``
micro-batches of ``train.batch_size`` x ``seq_length`` tokens, under the run's cost levers
(``train.precision``, ``train.gradient_checkpointing``, ``train.grad_accum``,
``model.quantize``; spelled as a run spells them):

- trainable / total parameters, counted on the modified meta model (tied tensors once);
- checkpoint bytes: what the method trains, in its training dtype (full: the whole model);
- weight, gradient and optimizer-state bytes in closed form (``cost.state_bytes``; a quantized
  base as ``peftbench.quantize`` stores it);
- activation bytes and the step's peak: the run's own training step (``train.OptimizerStep``,
  watched by ``cost.tracked_step``, which the calibration runs on real weights) on fake CPU
  tensors under the
  tensor-memory tracker, for the 2- and 3-layer models, extrapolated to every layer;
- training FLOPs per token and per step, as the run counts them (and, under checkpointing,
  the model FLOPs without the recomputation), plus the Korthikanti et al. (2022) closed form
  for activations, for comparison.

Modules: ``cost`` (the cost model), ``cli`` (the command: check, record, table),
``calibrate`` (estimates beside tracked real steps). Records have the measured-run format
(``kind: "estimate"``) and go to ``results_dir``. ``python -m peftbench.estimate calibrate``
puts each estimated part beside the tracker's measurement of the same real step on CPU, on the
small built-in models, for every lever and method (``docs/ESTIMATES.md``).
"""
