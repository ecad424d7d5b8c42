"""Model card templates, installed as `hubmerge.card_templates` (copy one to start your own)."""
