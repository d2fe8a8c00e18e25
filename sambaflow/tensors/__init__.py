"""SambaTensor, Samba parameters, factories and conversions."""
