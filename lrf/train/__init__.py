"""Training machinery shared by every trainer: lrf.train.loop."""
