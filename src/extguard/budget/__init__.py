"""Per-tenant token and cost budgets: windows, reservations and the stores that keep them."""
