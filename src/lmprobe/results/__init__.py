"""What a run leaves behind: tables, probe files, figures, run directories, baselines."""
