"""Nightly retraining (beat ▶ Ray job: train ▶ evaluate ▶ re-encode ▶ promote).

Not built yet: no issue has asked for it. The pieces it will assemble exist — the trainer
(hashing_models.trainer), model versions and the active pointer (hashlake.catalog), and the encode
stages (workers.encode) that a re-encode job reuses.
"""
