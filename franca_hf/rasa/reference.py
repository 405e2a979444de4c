"""The official RASA formula, step by step on the raw stored weights, as the official code applies it: an
independent check of the model's vectorised implementation (`franca_hf.modeling.remove_position_directions`), used
by the converter's verification and the tests. Not for production use: it loops over tokens' steps in Python."""

import torch


def official_rasa_chain(tokens: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(..., D) final-normed patch tokens with every step's two directions removed, in training order.

    Args:
        weights: (S, 2, D) the official `pre_pos_layers.0..n-1`, then `pos_pred` weights. Step s uses
            u_r = W[0] / |W[0]| and u_c = W[1] minus its u_r component, normalised, and subtracts the tokens'
            components along u_r and u_c.
    """
    debiased = tokens.float()
    for step in weights.float():
        u_r = step[0] / step[0].norm()
        u_c = step[1] - (step[1] @ u_r) * u_r
        u_c = u_c / u_c.norm()
        debiased = debiased - (debiased @ u_r)[..., None] * u_r - (debiased @ u_c)[..., None] * u_c
    return debiased
