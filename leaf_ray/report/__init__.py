"""Reports: printed tables, eval.md/eval.json, plots. They take plain objects and run no stage."""
