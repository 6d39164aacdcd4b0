"""peftbench: fine-tune one base model with full fine-tuning, LoRA, bottleneck adapters and
prefix tuning, and measure what each costs (parameters, memory, throughput, latency, quality).

Entry points: ``python -m peftbench`` (runs and sweeps), ``python -m peftbench.report``,
``python -m peftbench.compare``, ``python -m peftbench.estimate``.
"""

__version__ = "0.1.0"
