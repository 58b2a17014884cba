"""Networks: adapters giving net(x_t, t, cond) -> raw output over diffusers models, EMA, (later) LoRA and heads."""
