"""Stage 1, convert: raw datasets (VQA v2, easy-VQA, synthetic) into shard folders (`python -m data_pipeline.convert`)."""
