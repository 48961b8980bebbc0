"""The engine core: scheduler, KV block manager, sequences, vision queue, image cache and the step."""
