"""Graph passes: cutting the traced step into section programs."""
