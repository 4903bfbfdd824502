"""One module per model family, each with `train(recipe, out_dir) -> card`: the entry points of
`python -m training <family>` (training/__main__.py). What they share lives one level up:
classifier (the crop fine-tune), detection, data, augment, export, metrics."""
