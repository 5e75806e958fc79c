"""govmomi's vCenter simulator behind a Go main of ours (main.go), for a second opinion."""
