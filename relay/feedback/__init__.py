"""What comes back after delivery: bounces (delivery status notifications)
and spam complaints (ARF reports), read (``parse``) and acted on (``act``):
on record in the audit log, the address suppressed, the sender told."""
