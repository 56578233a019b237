"""What never imports torch: results loaded into pandas, analyses, figures and reports, compare and export."""
