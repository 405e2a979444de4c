"""Official Franca checkpoints to Hugging Face folders: the official key map (`checkpoint`), release downloads
(`releases`), verified conversion (`convert`), folder export and model cards (`export`, `model_card`) and publishing
(`hub`). The commands are one call each: `convert.convert(ConvertSettings)`, `hub.push(PushSettings)`,
`releases.release_table()` (the settings live in the cheap `settings`)."""
