from .pgd import PGDSettings, cross_entropy_loss, margin_loss, pgd_attack

__all__ = ["PGDSettings", "cross_entropy_loss", "margin_loss", "pgd_attack"]
