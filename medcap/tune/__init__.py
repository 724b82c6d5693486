"""Hyperparameter search over medcap runs (``medcap tune``): a YAML search space (``space``), Optuna
studies with TPE and pruning shared by any number of workers (``study``), and the study's report
(``report``)."""
