"""The parts of `invnet.fit` (see `invnet.train`): data, state, epoch, decision, checkpoints,
placement."""
