# The custom AMI: an AWS Deep Learning AMI with the spotrun .deb baked in.
#
#   make deb
#   packer build -var deb=dist/spotrun_0.1.0_all.deb packaging/ami/spotrun.pkr.hcl
#
# Instances launched from it run the agent on boot when their user data holds a job
# (`spotrun launch` writes it) and stay idle otherwise.
#
# Needs Packer >= 1.8 with the Amazon plugin >= 1.1 (`packer init` installs it) for
# metadata_options and imds_support. tests/system checks the syntax with Debian 12's
# packer 1.6.6 (`packer validate -syntax-only`), which predates both blocks' schemas.

packer {
  required_version = ">= 1.8.0"
  required_plugins {
    amazon = {
      version = ">= 1.1.0"
      source  = "github.com/hashicorp/amazon"
    }
  }
}

variable "deb" {
  type        = string
  description = "Path of the spotrun .deb to install (make deb)."
  default     = "dist/spotrun_0.1.0_all.deb"
}

variable "region" {
  type    = string
  default = "us-east-1"
}

variable "source_ami_name" {
  type        = string
  description = "Name filter of the Deep Learning AMI to start from (newest match wins)."
  default     = "Deep Learning OSS Nvidia Driver AMI GPU TensorFlow * (Ubuntu 22.04) *"
}

variable "instance_type" {
  type        = string
  description = "Build instance: a GPU type, so that the NVIDIA driver check below runs."
  default     = "g4dn.xlarge"
}

variable "ami_name_prefix" {
  type    = string
  default = "spotrun-dlami"
}

locals {
  stamp = regex_replace(timestamp(), "[- TZ:]", "")
}

source "amazon-ebs" "dlami" {
  region        = var.region
  instance_type = var.instance_type
  ssh_username  = "ubuntu"
  ami_name      = "${var.ami_name_prefix}-${local.stamp}"

  source_ami_filter {
    filters = {
      name                = var.source_ami_name
      architecture        = "x86_64"
      virtualization-type = "hvm"
      root-device-type    = "ebs"
    }
    owners      = ["amazon"]
    most_recent = true
  }

  # The build instance itself: IMDSv2 only, and a hop limit of 1 so that no container
  # on it can reach the metadata service.
  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = "required"
    http_put_response_hop_limit = 1
  }

  # Instances launched from the AMI: IMDSv2 only unless a launch template says otherwise
  # (`spotrun launch` also sets HttpTokens=required and hop limit 1 there).
  imds_support = "v2.0"

  tags = {
    Name          = "${var.ami_name_prefix}-${local.stamp}"
    "spotrun:ami" = "true"
    SourceAMI     = "{{ .SourceAMI }}"
  }
}

build {
  sources = ["source.amazon-ebs.dlami"]

  provisioner "file" {
    source      = var.deb
    destination = "/tmp/spotrun.deb"
  }

  provisioner "shell" {
    inline_shebang = "/bin/bash -e"
    inline = [
      # Exactly what docs/packaging.md and the system test do.
      "sudo apt-get update",
      "sudo DEBIAN_FRONTEND=noninteractive apt-get install -y /tmp/spotrun.deb",
      "rm /tmp/spotrun.deb",
      # Baked, not run: enabled for the next boots, not running now.
      "test \"$(systemctl is-enabled spotrun-agent)\" = enabled",
      "! systemctl is-active --quiet spotrun-agent",
      # And it starts on this AMI's Python (22.04: 3.10; a missing vendored module shows
      # here, not as a crash loop on every spot instance): the command, and the agent's
      # config loading with the shipped defaults plus the two keys a job's user data always
      # brings (the trainer user "ubuntu" is checked against this image).
      "spotrun --help >/dev/null",
      "printf '[code]\\nrepository = \"https://git.invalid/bake-check.git\"\\n[aws]\\nlease_table = \"spotrun-leases\"\\n' > /tmp/spotrun-check.toml",
      "sudo spotrun agent check-config --no-user-data --config /tmp/spotrun-check.toml",
      "rm /tmp/spotrun-check.toml",
      # Nitro exposes EBS as NVMe; AWS advises the longest I/O timeout so that a slow
      # volume (a migrated one still loading from its snapshot) is never failed by the kernel.
      "echo 'GRUB_CMDLINE_LINUX_DEFAULT=\"$GRUB_CMDLINE_LINUX_DEFAULT nvme_core.io_timeout=4294967295\"' | sudo tee /etc/default/grub.d/60-spotrun-nvme.cfg",
      "sudo update-grub",
      "nvidia-smi -L",
      # The next boot is a new instance: cloud-init must fetch its own user data, not keep
      # this build instance's copy (the agent's start condition looks at it).
      "sudo cloud-init clean --logs",
    ]
  }

  post-processor "manifest" {
    output     = "dist/ami-manifest.json"
    strip_path = true
  }
}
