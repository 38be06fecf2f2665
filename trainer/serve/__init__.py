"""Stage 8, export/serve: the exported model folder and prediction from it (`python -m trainer.serve.predict`)."""
