"""The backend target: nginx in front of blue-green colours or rolling instances."""
