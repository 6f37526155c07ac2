"""Data: sample files, chat templating with loss masks, images, mixtures, generated data."""
