"""gpt: modern language-model ideas, one readable file each, on one training spine.

See shared DESIGN in the README: config.py (GPTConfig, TrainConfig, presets), model.py (GPT, Block),
attention.py, rope.py, tokenizer.py, loader.py, generate.py, optim.py, checkpoint.py, plot.py.
"""
