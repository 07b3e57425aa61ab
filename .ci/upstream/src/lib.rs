// Placeholder: this manifest exists only to fetch sources.
