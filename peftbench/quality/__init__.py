"""Task quality beyond the loss, for causal LMs: accuracy by generation (``generation``), by
scoring each fixed choice's log-likelihood (``generation.choice_accuracy``), answer extraction
rules (``answers``), and forgetting: how far fine-tuning moved the model away from its base on
general prompts it never trains on (``forgetting``). Every function takes the model as it is
and measures; none trains."""
