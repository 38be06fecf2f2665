"""What both packages use that is not data: bad-input errors, atomic writes, the open_clip configs, the
machine description and progress bars. `common` imports neither `data_pipeline` nor `trainer`."""
