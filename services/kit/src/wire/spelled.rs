//! [`spelled_enum!`](crate::spelled_enum): an enum with one spelling for the database, events and
//! exports, and its protobuf counterpart, so each service states its value sets once.

/// Defines an enum with its database spelling and its protobuf counterpart:
///
/// ```ignore
/// aimesh_kit::spelled_enum!(
///     /// Who wrote a message.
///     MessageRole, pb::MessageRole, { System = "system", User = "user" }
/// );
/// ```
///
/// The enum derives serde (the calling crate depends on `serde`) and gets `ALL`, `as_str`,
/// `parse`, `parse_db` (a stored value that does not parse is an internal error), `to_proto`,
/// `from_proto` and `require_proto` (a request field that is unspecified or unknown is
/// INVALID_ARGUMENT naming the field and listing the spellings).
#[macro_export]
macro_rules! spelled_enum {
    ($(#[$doc:meta])* $name:ident, $pb:ty, { $($variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, ::serde::Serialize, ::serde::Deserialize)]
        #[serde(rename_all = "snake_case")]
        pub enum $name { $($variant),+ }

        impl $name {
            /// Every value, in declaration order.
            pub const ALL: &'static [Self] = &[$(Self::$variant),+];

            /// The spelling in the database, in events and in exports.
            pub fn as_str(self) -> &'static str {
                match self { $(Self::$variant => $text),+ }
            }

            /// Reads [`Self::as_str`]'s spelling.
            pub fn parse(value: &str) -> Option<Self> {
                match value { $($text => Some(Self::$variant),)+ _ => None }
            }

            /// A stored value; anything else is a bug, not the caller's fault.
            pub fn parse_db(value: &str) -> Result<Self, $crate::ServiceError> {
                Self::parse(value).ok_or_else(|| {
                    $crate::ServiceError::internal(format!(
                        concat!("unknown ", stringify!($name), " {:?} in the database"), value
                    ))
                })
            }

            pub fn to_proto(self) -> $pb {
                match self { $(Self::$variant => <$pb>::$variant),+ }
            }

            /// The protobuf value, `None` for unspecified or unknown ones.
            pub fn from_proto(value: i32) -> Option<Self> {
                match <$pb>::try_from(value) { $(Ok(<$pb>::$variant) => Some(Self::$variant),)+ _ => None }
            }

            /// The protobuf value of a request field, refusing unspecified and unknown ones.
            pub fn require_proto(value: i32, field: &str) -> Result<Self, $crate::ServiceError> {
                Self::from_proto(value).ok_or_else(|| {
                    let known: Vec<&str> = Self::ALL.iter().map(|v| v.as_str()).collect();
                    $crate::ServiceError::invalid_field(field, format!("must be one of: {}", known.join(", ")))
                })
            }
        }
    };
}
