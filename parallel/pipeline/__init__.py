"""Pipeline parallelism: the model's layers split into stages (`partition`), each rank's stages cut out of the
plain model (`stages`), and torch.distributed.pipelining schedules driving them (`runner`)."""
