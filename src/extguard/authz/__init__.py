"""The ext_authz server: who is calling, may they call this model, and is their budget spent."""
