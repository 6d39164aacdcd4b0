"""peftbench: fine-tune one base model with full fine-tuning, LoRA, bottleneck adapters and
prefix tuning, and measure what each costs (parameters, memory, throughput, latency, quality).

Entry points: ``python -m peftbench`` (runs and sweeps), ``python -m peftbench.report``,
``python -m peftbench.compare``, ``python -m peftbench.estimate``.
"""

import logging

__version__ = "0.1.0"

# torchao (imported by transformers when installed; peftbench.quantize uses it) logs a warning
# for each optional compiled kernel it cannot load on this machine, and torch's pytree one for
# each of torchao's enums: harmless here, so muted before anything imports them.
for _name in ("torchao", "torch.utils._pytree"):
    logging.getLogger(_name).setLevel(logging.ERROR)
