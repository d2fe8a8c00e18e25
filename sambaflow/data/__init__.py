"""Host-side data feeding: SambaLoader."""
