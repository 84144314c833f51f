//! Checks of request fields every service shares. Each error is INVALID_ARGUMENT naming the
//! field, so the caller knows what to fix.

use prost_types::FieldMask;
use uuid::Uuid;

use crate::wire::error::ServiceError;

/// A required id.
pub fn id(field: &str, value: &str) -> Result<Uuid, ServiceError> {
    if value.is_empty() {
        return Err(ServiceError::invalid_field(field, "is required"));
    }
    Uuid::parse_str(value).map_err(|_| ServiceError::invalid_field(field, "is not a valid id"))
}

/// An optional id: empty is `None`.
pub fn optional_id(field: &str, value: &str) -> Result<Option<Uuid>, ServiceError> {
    if value.is_empty() { Ok(None) } else { id(field, value).map(Some) }
}

/// A display text such as a name: trimmed, no control characters, at most `max` characters;
/// `required` refuses an empty one.
pub fn text(field: &str, value: &str, max: usize, required: bool) -> Result<String, ServiceError> {
    let text = value.trim();
    if required && text.is_empty() {
        return Err(ServiceError::invalid_field(field, "is required"));
    }
    if text.chars().count() > max {
        return Err(ServiceError::invalid_field(field, format!("must be at most {max} characters long")));
    }
    if text.chars().any(char::is_control) {
        return Err(ServiceError::invalid_field(field, "must not contain control characters"));
    }
    Ok(text.to_owned())
}

/// The paths of an update mask, each one of `allowed`. An empty mask is refused rather than
/// taken as "everything", so a client that forgot it changes nothing by accident.
pub fn mask_paths(mask: Option<&FieldMask>, allowed: &[&str]) -> Result<Vec<String>, ServiceError> {
    let paths = mask.map(|m| m.paths.clone()).unwrap_or_default();
    if paths.is_empty() {
        return Err(ServiceError::invalid_field(
            "update_mask",
            format!("name at least one of: {}", allowed.join(", ")),
        ));
    }
    if let Some(unknown) = paths.iter().find(|path| !allowed.contains(&path.as_str())) {
        return Err(ServiceError::invalid_field(
            "update_mask",
            format!("unknown path {unknown:?}; allowed: {}", allowed.join(", ")),
        ));
    }
    Ok(paths)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field_of<T: std::fmt::Debug>(result: Result<T, ServiceError>) -> Option<String> {
        result.expect_err("should be refused").field
    }

    #[test]
    fn ids() {
        let uuid = Uuid::new_v4();
        assert_eq!(id("project_id", &uuid.to_string()).ok(), Some(uuid));
        assert_eq!(field_of(id("project_id", "")), Some("project_id".into()));
        assert_eq!(field_of(id("project_id", "nope")), Some("project_id".into()));
        assert_eq!(optional_id("user_id", "").ok(), Some(None));
    }

    #[test]
    fn texts() {
        assert_eq!(text("name", "  Team  ", 10, true).ok().as_deref(), Some("Team"));
        assert!(text("name", "Team\u{0}X", 100, true).is_err());
        assert!(text("name", "  ", 100, true).is_err());
        assert!(text("name", "", 100, false).is_ok());
        assert!(text("name", &"x".repeat(101), 100, true).is_err());
    }

    #[test]
    fn masks() {
        let mask = |paths: &[&str]| FieldMask { paths: paths.iter().map(|p| (*p).to_owned()).collect() };
        assert_eq!(mask_paths(Some(&mask(&["name"])), &["name", "description"]).ok(), Some(vec!["name".to_owned()]));
        assert_eq!(field_of(mask_paths(None, &["name"])), Some("update_mask".into()));
        assert_eq!(field_of(mask_paths(Some(&mask(&["email"])), &["name"])), Some("update_mask".into()));
    }
}
