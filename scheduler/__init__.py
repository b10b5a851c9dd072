"""Nightly retraining (beat ▶ Ray job: train ▶ evaluate ▶ re-encode ▶ promote).

Built so far: ``promote`` (re-encode the bucket under a published version, then switch the active
pointer; ``hashlake model promote``). Not built yet: the beat schedule and the Ray job that trains and
evaluates, then publishes (``hashlake.models.publish_checkpoint(activate=False)``) and promotes.
"""
