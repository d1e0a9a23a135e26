"""Training: the one loop for every stage (``loop``), run setup (``setup``), where the weights start
(``init``), in-loop evaluation (``evaluation``), the optimizer and schedule (``optim``), processes
and ranks (``distributed``), signals (``signals``) and the console/metrics/wandb monitor
(``monitor``)."""
