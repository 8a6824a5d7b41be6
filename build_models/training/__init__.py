"""What the training steps (distill, finetune) share: the world of processes, the distribution
strategies behind one interface, the training texts and the optimisation loop."""
