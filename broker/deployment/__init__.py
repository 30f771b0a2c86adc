"""What the operating system enforces around the two halves: users and folders, firewall, posture."""
