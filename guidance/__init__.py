"""Guidance core: schedules, parameterisations, guiders, the guided denoiser and samplers (torch only)."""
