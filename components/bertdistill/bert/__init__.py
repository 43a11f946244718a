"""BERT in TensorFlow 2: config, model, checkpoints. Imports TensorFlow; data steps never do."""
