"""A tuned comparison (``python -m peftbench.tune``): each method's learning rate searched on a
log grid around its default with cheap trials on the validation split, the best chosen on a
validation objective (a record per method in ``<results_dir>/selection``), then each method run at
its chosen rate with several seeds on the test split with every measurement. ``plan`` says which
jobs and reads the selection from the trials' records; ``cli`` is the command.
"""
