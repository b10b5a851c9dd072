"""Nightly retraining: beat ▶ Ray job (data ▶ train ▶ evaluate ▶ re-encode ▶ flip) ▶ the new version serves.

    tasks.py     the beat entry's Celery task: submits the night's run (``submit.submit_nightly``)
    submit.py    one Ray job per scheduled slot; manual runs, resuming, following a run
    retrain/     the job itself (``python -m scheduler.retrain``), its steps and its run records
    promote.py   re-encode the bucket under a version, then move the active pointer (the job's flip step;
                 ``hashlake model promote``)
    metrics.py   what a run pushes to the Pushgateway
"""
