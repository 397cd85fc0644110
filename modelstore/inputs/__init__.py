"""What a store is made from: checkpoints read tensor by tensor (local, sharded, Hub ids), task
tensor names matched to the base's, and which tensors are merged and sparsified."""
