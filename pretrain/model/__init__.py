from pretrain.model.config import ModelConfig, RopeConfig
from pretrain.model.flops import count_parameters, flops_per_token
from pretrain.model.loss import lm_loss
from pretrain.model.transformer import Transformer

__all__ = ["ModelConfig", "RopeConfig", "Transformer", "count_parameters", "flops_per_token", "lm_loss"]
