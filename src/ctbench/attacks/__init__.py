from .pgd import PGDSettings, cross_entropy_loss, describe_pgd, evaluation_pgd, margin_loss, pgd_attack

__all__ = ["PGDSettings", "cross_entropy_loss", "describe_pgd", "evaluation_pgd", "margin_loss", "pgd_attack"]
