//! Protobuf messages and gRPC stubs of every aimesh service; the module tree mirrors the
//! protobuf packages (`aimesh.identity.v1` is [`identity::v1`]).

/// The encoded `FileDescriptorSet` of every aimesh proto, for gRPC reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/aimesh_descriptor.bin"));

/// The identity service: users, login sessions, projects, API keys, settings.
pub mod identity {
    /// Version 1 of the identity API.
    pub mod v1 {
        #![allow(clippy::all, missing_docs)]
        tonic::include_proto!("aimesh.identity.v1");
    }
}

/// The usage service: model catalog and prices, usage records, quotas and budgets.
pub mod usage {
    /// Version 1 of the usage API.
    pub mod v1 {
        #![allow(clippy::all, missing_docs)]
        tonic::include_proto!("aimesh.usage.v1");
    }
}

/// The chat service: sessions and messages, live watch, search, export.
pub mod chat {
    /// Version 1 of the chat API.
    pub mod v1 {
        #![allow(clippy::all, missing_docs)]
        tonic::include_proto!("aimesh.chat.v1");
    }
}

/// The files service: uploads and downloads, metadata, attachments.
pub mod files {
    /// Version 1 of the files API.
    pub mod v1 {
        #![allow(clippy::all, missing_docs)]
        tonic::include_proto!("aimesh.files.v1");
    }
}

/// The analytics service: event ingestion, usage queries, the audit log.
pub mod analytics {
    /// Version 1 of the analytics API.
    pub mod v1 {
        #![allow(clippy::all, missing_docs)]
        tonic::include_proto!("aimesh.analytics.v1");
    }
}
