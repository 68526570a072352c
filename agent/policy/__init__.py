"""The reference policy (spec/policy.md): rules XS001-XS020, two profiles, bounded state."""
