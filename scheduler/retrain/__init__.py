"""The retraining job: ``job.py`` runs the steps, ``data.py`` reads the lake's labelled features, ``train.py``
fits a head with Ray Train, ``gate.py`` compares it with the active version, ``reencode.py`` writes its
codes with Ray Data, ``state.py`` records the run."""
